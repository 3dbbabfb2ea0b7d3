-- The fine-tuned simulators trained so far, newest first: held-out correlation against the
-- shuffled-description control, and where the checkpoint is.
SELECT version, created_at, backbone, stage1_steps, stage2_steps, round(final_loss, 4) AS final_loss,
       round(heldout_correlation, 3) AS heldout, round(heldout_shuffled_correlation, 3) AS shuffled, path
FROM simulator_checkpoints
ORDER BY created_at DESC;
