-- Per layer and backend: candidates made, failed, and tokens spent (the explainer's cost).
SELECT layer, backend, explainer_model, count(*) AS candidates,
       count(*) FILTER (WHERE failure IS NOT NULL) AS failed,
       sum(prompt_tokens) AS prompt_tokens, sum(completion_tokens) AS completion_tokens
FROM candidate_descriptions
GROUP BY ALL
ORDER BY layer, backend;
