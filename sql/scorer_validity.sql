-- Scorer validity: per puzzle set and scorer (correlation/<simulator>, embedding), the share
-- of puzzles whose true description scores highest (ties share), chance, the mean margin of
-- the true description over the best false one, and whether it beats chance clearly;
-- `selecting` marks the simulator that picks each feature's best candidate.
CREATE OR REPLACE VIEW scorer_validity AS
SELECT * FROM read_parquet('{data}/scorer_validity/*.parquet');
