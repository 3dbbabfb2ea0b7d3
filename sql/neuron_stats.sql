-- Per feature (kind: neuron or sae, an SAE latent of the layer's site) x polarity, over the train split: max, mean, std, fraction of active tokens and
-- approximate quantiles (q50 ... q999), in the polarity's orientation (sign * activation).
-- scale is the activation normalizer (the train max): prompts' 0-10 levels, the simulator's
-- training classes and fuzzing marks all divide by it.
CREATE OR REPLACE VIEW neuron_stats AS
-- layer and polarity come from the folder names (layer=L/polarity=P), first as ever.
SELECT layer, polarity, * EXCLUDE (layer, polarity)
FROM read_parquet('{data}/neuron_stats/*/*/*.parquet', union_by_name = true);
