-- One row per description cluster: its number, label, size, coherence, how many layers and
-- which polarities and kinds it spans, its members' mean test score, and the description
-- nearest its centroid (its members: the description_clusters view).
CREATE OR REPLACE VIEW description_cluster_summary AS
SELECT cluster, any_value(label) AS label, any_value(label_source) AS label_source, any_value(size) AS size,
       any_value(coherence) AS coherence, count(DISTINCT layer) AS layers, min(layer) AS first_layer,
       max(layer) AS last_layer, string_agg(DISTINCT polarity, ',' ORDER BY polarity) AS polarities,
       string_agg(DISTINCT kind, ',' ORDER BY kind) AS kinds, avg(score) AS mean_score,
       arg_min(description, member_rank) AS nearest_description
FROM description_clusters
GROUP BY cluster
ORDER BY cluster;
