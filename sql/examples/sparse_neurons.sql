-- The sparsest neurons per layer: those active on the smallest share of tokens.
SELECT layer, neuron, round(frac_active, 4) AS frac_active, round(max, 3) AS max
FROM neuron_stats
WHERE polarity = 'pos'
QUALIFY row_number() OVER (PARTITION BY layer ORDER BY frac_active) <= 3
ORDER BY layer, frac_active;
