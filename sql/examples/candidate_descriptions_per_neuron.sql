-- The candidate descriptions of one neuron (layer 3, neuron 975 (in the demo's sample), positive polarity), with
-- what made each: prompt format, puzzle, exemplars shown, tokens, failures.
SELECT candidate, description, prompt_format, puzzle, len(exemplar_seq_ids) AS exemplars,
       prompt_tokens, completion_tokens, round(latency_s, 2) AS latency_s, failure
FROM candidate_descriptions
WHERE layer = 3 AND neuron = 975 AND polarity = 'pos'
ORDER BY candidate;
