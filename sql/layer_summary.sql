-- Per layer x polarity x kind (neuron, or sae for SAE latents): how well the selected
-- descriptions predict their features, neurons and latents of a layer side by side. The val
-- score picked the description, so the test score is the unbiased one; the shuffled control
-- is the chance level to compare it with. Rows whose simulator trained on the neuron
-- (simulator_saw_feature true) are left out and counted in `leaked`.
CREATE OR REPLACE VIEW layer_summary AS
SELECT layer, polarity, coalesce(kind, 'neuron') AS kind,
       any_value(scorer) AS scorer,
       any_value(simulator) AS simulator,
       count(*) AS neurons,
       avg(val_score) AS mean_val_score,
       avg(test_score) AS mean_test_score,
       median(test_score) AS median_test_score,
       avg(val_score - test_score) AS mean_val_minus_test,
       avg(control_test_score) AS mean_control_test_score,
       avg(test_score - control_test_score) AS mean_test_above_control,
       avg(CASE WHEN test_score > control_test_score THEN 1.0 ELSE 0.0 END)
           FILTER (WHERE control_test_score IS NOT NULL) AS share_above_control,
       count(*) FILTER (WHERE len(val_flags) > 0 OR len(test_flags) > 0) AS flagged,
       any_value(leaked) AS leaked
FROM (SELECT *, count(*) FILTER (WHERE simulator_saw_feature)
                 OVER (PARTITION BY layer, polarity, coalesce(kind, 'neuron')) AS leaked
      FROM neuron_descriptions)
WHERE simulator_saw_feature IS NOT TRUE
GROUP BY layer, polarity, coalesce(kind, 'neuron')
ORDER BY layer, polarity, kind DESC;
