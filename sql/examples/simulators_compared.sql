-- Every simulator's correlation on the same candidates, beside its shuffled control: a
-- simulator is useful when its candidates score well above the descriptions of other neurons.
SELECT simulator, layer,
       round(avg(score) FILTER (WHERE role = 'candidate'), 3) AS candidates,
       round(avg(score) FILTER (WHERE role = 'shuffled_control'), 3) AS shuffled_control,
       count(*) FILTER (WHERE list_contains(flags, 'constant_prediction')) AS constant_predictions
FROM description_scores
WHERE scorer = 'correlation' AND split = 'val'
GROUP BY ALL
ORDER BY simulator, layer;
