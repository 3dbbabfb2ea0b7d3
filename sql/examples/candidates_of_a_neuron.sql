-- Every candidate of one neuron (layer 3, neuron 975 (in the demo's sample), positive polarity) with each scorer's
-- val score side by side; candidate -1 is the shuffled control.
PIVOT (SELECT candidate, role, description, scorer, round(score, 3) AS score
       FROM description_scores
       WHERE layer = 3 AND neuron = 975 AND polarity = 'pos' AND split = 'val')
ON scorer USING any_value(score)
ORDER BY candidate;
