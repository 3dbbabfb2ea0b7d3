-- Per neuron x polarity: the next tokens its output direction promotes (logit lens: the
-- unembedding times the final norm's scale times the neuron's down-projection column; for
-- the negative polarity, the most negative logits, negated). rank 0 is the strongest.
-- kind 'sae' rows are SAE latents: their direction is the latent's decoder row through the
-- down-projection.
CREATE OR REPLACE VIEW output_tokens AS
SELECT * FROM read_parquet('{data}/output_tokens/*/*/*.parquet', union_by_name = true);
