-- Per selected description (layer x polarity, kind, neuron): what the feature does when it is
-- changed (neuron_assets.steer.effects). ablation_loss_delta: mean next-token loss change (nats,
-- ablated minus intact) on the feature's top test exemplars with the feature set to 0 at their
-- counted tokens; ablation_kl: mean KL(intact || ablated) there; ablation_tokens: predictions
-- counted. steer_value: the value the feature was set to (its q99 times the strength);
-- agreement: mean over n_prompts neutral prompts of cos(e(steered) - e(baseline), e(description)),
-- e the search's sentence encoder, greedy continuations of n_tokens; control_agreement: the same
-- with the control description; agreement_beats_control; changed_share: prompts whose
-- continuation changed; output_token_similarity / output_token_control: cos(e(the top promoted
-- tokens of output_tokens), e(description or control)); output_token_overlap: share of those
-- tokens the description names. test_score: the description's input-side score.
CREATE OR REPLACE VIEW description_effects AS
SELECT layer, polarity, * EXCLUDE (layer, polarity)
FROM read_parquet('{data}/description_effects/*/*/*.parquet', union_by_name = true);
