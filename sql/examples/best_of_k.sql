-- How much sampling more candidates helps: the mean best-of-k correlation for each k and
-- simulator, and the power-law fit through it.
SELECT simulator, k, round(mean_best, 4) AS mean_best, round(fitted, 4) AS fitted, neurons,
       round(fit_a, 4) AS a, round(fit_b, 4) AS b
FROM best_of_k_curve
WHERE scorer = 'correlation'
ORDER BY simulator, k;
