-- The fine-tuned simulator's training rows: one per (fold, feature, exemplar). `fold` is the
-- fold whose simulator the row is for (no simulator grades a feature it was trained on);
-- `role` is stage1 (trained on the chosen description), stage2 (trained on every candidate,
-- `candidates`), stage2_rerank (stage 2's val exemplars to re-rank on) or heldout (measured
-- after training, beside `control_description`, another held-out feature's description).
-- `activations` are the true per-token activations in the polarity's orientation, `labels`
-- their 0-10 classes (the prefix is 0). `sample` says how the exemplar was drawn.
CREATE OR REPLACE VIEW simulator_training_data AS
SELECT * FROM read_parquet('{data}/simulator_training_data/*.parquet');
