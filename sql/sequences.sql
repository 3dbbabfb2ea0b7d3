-- The corpus: one row per fixed-length token sequence. Tokens are stored here once;
-- every other table refers to a sequence by seq_id.
CREATE OR REPLACE VIEW sequences AS
SELECT * FROM read_parquet('{data}/sequences/*.parquet');
