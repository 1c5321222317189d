"""Small verifiable-reward tasks, a locally built tokenizer and a tiny random causal-LM builder.

Nothing here downloads anything: the tokenizer's vocabulary is defined in
code and the model is initialised at random from a ``transformers`` config.

>>> from rl2fx.trainer.tasks import DigitCopyTask, build_tokenizer, build_tiny_lm
>>> tok = build_tokenizer(); task = DigitCopyTask(n_digits=2)
>>> model = build_tiny_lm(len(tok), hidden_size=32, num_layers=1, num_heads=2)
>>> batch = task.sample_prompts(2)
>>> batch.input_ids.shape
torch.Size([2, 4])
"""

from rl2fx.trainer.tasks.digits import DigitCopyTask, PromptBatch
from rl2fx.trainer.tasks.model import (
    ARCHITECTURES,
    CausalValueModel,
    build_tiny_critic,
    build_tiny_lm,
    check_model_args,
)
from rl2fx.trainer.tasks.tokenizer import VOCAB, build_tokenizer

__all__ = ["DigitCopyTask", "PromptBatch", "build_tiny_lm", "build_tiny_critic", "CausalValueModel", "ARCHITECTURES", "check_model_args", "build_tokenizer", "VOCAB"]
