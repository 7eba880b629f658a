"""lm-eval hooks for the character tasks: thin names for the tested functions in `charforge.evaluation.lm_eval_tasks`."""

from charforge.evaluation.lm_eval_tasks import (  # noqa: F401  (referenced from the YAML files with !function)
    load_probes,
    macro_f1,
    make_chat_task,
    score_boundary,
    score_generation,
    score_likelihood,
)

CharacterChatTask = make_chat_task()
