-- Selected descriptions that do no better on test than a description of another neuron:
-- candidates for a better explainer, more exemplars, or a neuron that is hard to describe.
SELECT layer, polarity, neuron, description, round(test_score, 3) AS test,
       round(control_test_score, 3) AS control, val_flags, test_flags
FROM neuron_descriptions
WHERE test_score <= control_test_score
ORDER BY test_score - control_test_score
LIMIT 20;
