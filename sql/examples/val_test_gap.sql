-- Selecting the best of k by val overfits val a little: the gap between the selected
-- description's val and test scores, per layer, with the best-of-k gain it buys (best val
-- minus the mean candidate's val, for the scorer and simulator that selected).
WITH gain AS (
    SELECT layer, polarity, neuron, scorer, simulator, max(score) - avg(score) AS best_of_k_gain
    FROM description_scores
    WHERE role = 'candidate' AND split = 'val'
    GROUP BY ALL
)
SELECT n.layer, count(*) AS neurons,
       round(avg(n.val_score), 3) AS val, round(avg(n.test_score), 3) AS test,
       round(avg(n.val_score - n.test_score), 3) AS val_minus_test,
       round(avg(g.best_of_k_gain), 3) AS best_of_k_gain
FROM neuron_descriptions n JOIN gain g USING (layer, polarity, neuron, scorer, simulator)
GROUP BY n.layer
ORDER BY n.layer;
