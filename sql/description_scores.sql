-- Every candidate description (of a neuron or, kind 'sae', an SAE latent) x scorer on E_val (the top-20 val exemplars and 5 random val
-- sequences), one row each (split = 'val'); the selecting scorer also scores every candidate
-- on E_test (split = 'test', for best_of_k_curve; val alone selects). role = 'candidate' rows
-- are the k candidates (candidate 0..k-1); role = 'shuffled_control' rows (candidate -1)
-- score the description selected for another neuron of the same layer and polarity
-- (source_neuron) the same way: what a score is worth by chance. flags say why a score is a default (e.g. constant_prediction scores 0).
-- simulator_version names the simulator that scored the row (null for the rule-based and
-- pretrained ones); simulator_saw_feature says whether it trained on the row's neuron:
-- cross-fitting keeps it false everywhere (null: a given checkpoint, training unknown).
CREATE OR REPLACE VIEW description_scores AS
-- layer and polarity come from the folder names (layer=L/polarity=P), first as ever.
SELECT layer, polarity, * EXCLUDE (layer, polarity)
FROM read_parquet('{data}/description_scores/*/*/*.parquet', union_by_name = true);
