-- Families of descriptions, one row per member (neuron-assets clusters lists them): the
-- selected descriptions' search vectors clustered by average linkage on cosine distance, cut
-- at clusters.distance. cluster: its number, from 1, largest first; label: a name for it (the
-- member description nearest the centroid, or an LLM's, as label_source says); coherence: the
-- mean pairwise cosine similarity of its members; size: its members; member_rank: 1 for the
-- member nearest the centroid; layer, polarity, kind, neuron: the member's feature;
-- description and score: its selected description and test score; centroid_distance: cosine
-- distance of the description to the cluster's mean direction; model, config_hash, run_id.
CREATE OR REPLACE VIEW description_clusters AS
SELECT * FROM read_parquet('{data}/description_clusters/*.parquet');
