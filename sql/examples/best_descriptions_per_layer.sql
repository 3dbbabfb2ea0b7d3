-- The three best-described neurons of each layer (positive polarity) by test score, beside
-- their shuffled control: a description is worth what it scores above its control.
SELECT layer, neuron, description, round(test_score, 3) AS test, round(control_test_score, 3) AS control
FROM neuron_descriptions
WHERE polarity = 'pos'
QUALIFY row_number() OVER (PARTITION BY layer ORDER BY test_score DESC) <= 3
ORDER BY layer, test DESC;
