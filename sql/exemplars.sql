-- Per feature x polarity x split: the top-k sequences by per-sequence max (pos) or min (neg)
-- activation (sample 'top', rank 0 = most extreme), random sequences shared by every feature
-- ('random'), activation-decile samples of the activating sequences ('quantile', `bin` 0 =
-- lowest decile), and a uniform sample of this feature's quiet sequences ('quiet': extreme at
-- or below exemplars.activating_fraction of the train max), with per-token activations
-- (signed, half precision; join `sequences` on seq_id for the tokens).
-- `extreme` is the sequence's most extreme activation in the polarity's orientation.
-- `sample` says how the row was drawn, as above; `kind` is the feature's kind (neuron, or sae
-- for an SAE latent, whose index is in `neuron`), as in every other table.
CREATE OR REPLACE VIEW exemplars AS
-- layer and polarity come from the folder names (layer=L/polarity=P), first as ever.
SELECT layer, polarity, * EXCLUDE (layer, polarity)
FROM read_parquet('{data}/exemplars/*/*/*.parquet', union_by_name = true);
