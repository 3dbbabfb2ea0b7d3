-- One row per selected description (source 'selected'; with search.candidates also every
-- candidate, source 'candidate') and its sentence vector (embedding_model, L2-normalized),
-- keyed by text_hash (SHA-256 of the text). score: the selected description's test score.
-- Search it with neuron-assets search, or by hand:
--   SELECT neuron, description, array_cosine_similarity(embedding::FLOAT[384], (SELECT embedding::FLOAT[384]
--   FROM description_embeddings LIMIT 1)) AS sim FROM description_embeddings ORDER BY sim DESC LIMIT 5
CREATE OR REPLACE VIEW description_embeddings AS
-- layer and polarity come from the folder names (layer=L/polarity=P), first as ever.
SELECT layer, polarity, * EXCLUDE (layer, polarity)
FROM read_parquet('{data}/description_embeddings/*/*/*.parquet', union_by_name = true);
