-- Per neuron x polarity x split: the top-k sequences by per-sequence max (pos) or min (neg)
-- activation, random sequences, and activation-decile samples, with per-token activations
-- (signed, half precision; join `sequences` on seq_id for the tokens).
-- `extreme` is the sequence's most extreme activation in the polarity's orientation.
CREATE OR REPLACE VIEW exemplars AS
SELECT * FROM read_parquet('{data}/exemplars/*/*/*.parquet', union_by_name = true);
