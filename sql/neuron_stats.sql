-- Per neuron x polarity, over the train split: max, mean, std, fraction of active tokens and
-- approximate quantiles (q50 ... q999), in the polarity's orientation (sign * activation).
CREATE OR REPLACE VIEW neuron_stats AS
SELECT * FROM read_parquet('{data}/neuron_stats/*/*/*.parquet', union_by_name = true);
