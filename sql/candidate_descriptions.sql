-- Per feature (kind: neuron or sae) x polarity: the k candidate descriptions of best-of-k, one row each, with the
-- backend, explainer model, prompt format, exemplar seq_ids and puzzle that made it, token
-- counts and latency. A failed candidate has a null description and its reason in `failure`.
CREATE OR REPLACE VIEW candidate_descriptions AS
-- layer and polarity come from the folder names (layer=L/polarity=P), first as ever.
SELECT layer, polarity, * EXCLUDE (layer, polarity)
FROM read_parquet('{data}/candidate_descriptions/*/*/*.parquet', union_by_name = true);
