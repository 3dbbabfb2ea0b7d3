"""The distilled explainer (Transluce): a causal LM fine-tuned to answer the explainer prompt
with a feature's best description, and its evaluation against the model it started from.

It sits above :mod:`neuron_assets.score` (its evaluation scores candidates) and uses the
explainer's prompts (:mod:`neuron_assets.explain`):

- :mod:`~neuron_assets.distill.train`: the train / held-out split of features, the prompts
  and answers (:func:`build_examples`) and their token ids (:func:`encode_example`), and the
  fine-tune (:func:`distill_explainer`) with the shared loop of :mod:`neuron_assets.finetune`;
- :mod:`~neuron_assets.distill.evaluate`: base vs distilled explainer on held-out features,
  the best-of-k curves (:func:`evaluate_explainers`).
"""

from neuron_assets.distill.evaluate import (
    BASE,
    CURVE_SCHEMA,
    DISTILLED,
    NO_DESCRIPTION,
    ExplainerCurve,
    curve_frame,
    evaluate_explainers,
)
from neuron_assets.distill.train import (
    DISTILL_INFO,
    IGNORED,
    DistilledExplainer,
    DistillError,
    DistillExample,
    EncodedExample,
    FeatureSplit,
    answer_for,
    answer_loss,
    best_descriptions,
    build_examples,
    distill_explain_config,
    distill_explainer,
    distill_version,
    encode_example,
    heldout_rank,
    load_base_model,
    load_base_tokenizer,
    peak_rss_mb,
    read_distilled,
    split_features,
)

__all__ = [
    "BASE", "CURVE_SCHEMA", "DISTILLED", "DISTILL_INFO", "IGNORED", "NO_DESCRIPTION", "DistillError",
    "DistillExample", "DistilledExplainer", "EncodedExample", "ExplainerCurve", "FeatureSplit", "answer_for",
    "answer_loss", "best_descriptions", "build_examples", "curve_frame", "distill_explain_config",
    "distill_explainer", "distill_version", "encode_example", "evaluate_explainers", "heldout_rank",
    "load_base_model", "load_base_tokenizer", "peak_rss_mb", "read_distilled", "split_features",
]
