-- One row per feature x polarity (kind 'neuron', or 'sae' for an SAE latent: neuron is then
-- the latent's index; latents have only the pos polarity): the best of its k candidates by val score (scorer), its
-- score on E_test (the top-20 test exemplars and 5 random test sequences), and the shuffled
-- control's val and test scores (a description of control_source_neuron, scored the same way).
-- simulator_version / test_simulator_version: the simulator of the val / test score;
-- simulator_saw_feature: whether either trained on this neuron (false under cross-fitting).
-- n_candidates: the distinct candidates scored (a repeated text is scored once).
CREATE OR REPLACE VIEW neuron_descriptions AS
-- layer and polarity come from the folder names (layer=L/polarity=P), first as ever.
SELECT layer, polarity, * EXCLUDE (layer, polarity)
FROM read_parquet('{data}/neuron_descriptions/*/*/*.parquet', union_by_name = true);
