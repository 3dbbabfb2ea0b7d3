-- One row per trained fine-tuned simulator: where its checkpoint is, its backbone, steps per
-- stage, last loss, and its held-out correlation beside the shuffled-description control.
CREATE OR REPLACE VIEW simulator_checkpoints AS
SELECT * FROM read_parquet('{data}/simulator_checkpoints/*.parquet');
