-- The five strongest train exemplars of layer 3, neuron 975 (in the demo's sample), positive polarity, as text.
SELECT e.rank, round(e.extreme, 3) AS extreme, array_to_string(s.tokens, '') AS text
FROM exemplars e JOIN sequences s USING (seq_id)
WHERE e.layer = 3 AND e.neuron = 975 AND e.polarity = 'pos' AND e.split = 'train' AND e.sample = 'top'
ORDER BY e.rank
LIMIT 5;
