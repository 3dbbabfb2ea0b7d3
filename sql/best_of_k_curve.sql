-- Best-of-k on test, val only selecting: for k = 1 .. (candidates per neuron), per scorer and
-- simulator (simulator '' for scorers without one), the mean over neurons of the TEST score
-- of the candidate that the VAL score selects among k, computed exactly over all k-subsets
-- of each neuron's candidates: sorted ascending by val (ties: the lower candidate number
-- last, as selection breaks ties), the i-th of n is the val-best of C(i-1, k-1) of the C(n, k)
-- subsets. Only the selecting scorer scores every candidate on test, so only it has a curve.
-- Plus the power-law fit mean_best(k) = fit_a * k^fit_b (least squares in log-log space;
-- null when a mean is <= 0). Rows from a simulator that trained on the neuron are left out.
-- Neurons and SAE latents (kind) are features alike here.
CREATE OR REPLACE VIEW best_of_k_curve AS
WITH candidates AS (
    SELECT layer, polarity, kind, neuron, candidate, scorer, coalesce(simulator, '') AS simulator, split, score
    FROM description_scores
    WHERE role = 'candidate' AND simulator_saw_feature IS NOT TRUE
),
paired AS (
    SELECT v.layer, v.polarity, v.kind, v.neuron, v.candidate, v.scorer, v.simulator, v.score AS val_score,
           t.score AS test_score
    FROM candidates v
    JOIN candidates t USING (layer, polarity, kind, neuron, candidate, scorer, simulator)
    WHERE v.split = 'val' AND t.split = 'test'
),
scored AS (
    SELECT *,
           row_number() OVER (PARTITION BY layer, polarity, kind, neuron, scorer, simulator
                              ORDER BY val_score, candidate DESC) AS i,
           count(*) OVER (PARTITION BY layer, polarity, kind, neuron, scorer, simulator) AS n
    FROM paired
),
ks AS (
    SELECT scorer, simulator, unnest(generate_series(1, max(n))) AS k FROM scored GROUP BY scorer, simulator
),
per_neuron AS (
    SELECT s.layer, s.polarity, s.kind, s.neuron, s.scorer, s.simulator, ks.k,
           sum(s.test_score * exp(lgamma(s.i) - lgamma(ks.k) - lgamma(s.i - ks.k + 1)
                                  - (lgamma(s.n + 1) - lgamma(ks.k + 1) - lgamma(s.n - ks.k + 1)))) AS best
    FROM scored s JOIN ks ON ks.scorer = s.scorer AND ks.simulator = s.simulator AND s.n >= ks.k AND s.i >= ks.k
    GROUP BY ALL
),
curve AS (
    SELECT scorer, simulator, k, avg(best) AS mean_best, count(*) AS neurons FROM per_neuron GROUP BY ALL
),
fit AS (
    SELECT scorer, simulator,
           bool_and(mean_best > 0) AND count(*) >= 2 AS fittable,
           regr_slope(CASE WHEN mean_best > 0 THEN ln(mean_best) END, ln(k)) AS b,
           regr_intercept(CASE WHEN mean_best > 0 THEN ln(mean_best) END, ln(k)) AS log_a
    FROM curve GROUP BY scorer, simulator
)
SELECT c.scorer, c.simulator, c.k, c.mean_best, c.neurons,
       CASE WHEN f.fittable THEN exp(f.log_a) END AS fit_a,
       CASE WHEN f.fittable THEN f.b END AS fit_b,
       CASE WHEN f.fittable THEN exp(f.log_a) * pow(c.k, f.b) END AS fitted
FROM curve c JOIN fit f USING (scorer, simulator)
ORDER BY c.scorer, c.simulator, c.k;
