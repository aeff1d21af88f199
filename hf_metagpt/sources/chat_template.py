"""Chat templates: which one the merged tokenizer gets, and from where.

A tokenizer keeps its chat template in `chat_template.jinja` (transformers ≥ 4.43 writes it),
`chat_template.json`, or the `chat_template` field of `tokenizer_config.json` (a string, or a
list of named templates). The output's template is, in this order:

- `chat_template` as asked (`MergeOptions.chat_template`, mergekit's `chat_template:` key):
  `auto` — the template most of the inputs have (ties: the first input's, the base first);
  `chatml`, `llama3`, `alpaca`, `mistral` or `exaone` — those well-known formats, by the names mergekit
  0.1.5 ships them under (our own text of each format, written from its public description);
  the name of one of the inputs — that input's template; anything with `{{` or `{%` — that text;
- otherwise the tokenizer source's own template;
- and when the tokenizer source has none (the paper's setting: a base model and chat fine-tunes),
  the fine-tunes' template, the most common one if they disagree (said in a warning).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import Sequence

from ..errors import RecipeError
from .local import side_file

log = logging.getLogger(__name__)

#: files that may hold a chat template (fetched with each Hub input's side files)
TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json", "tokenizer_config.json")

#: well-known formats, by the names mergekit's `chat_template:` uses (our own text of them)
BUILTIN = {
    "chatml": ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content']"
               " + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}"
               "{{ '<|im_start|>assistant\\n' }}{% endif %}"),
    "llama3": ("{% for message in messages %}{% if loop.first %}{{ bos_token }}{% endif %}"
               "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
               " + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
               "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"),
    # Stanford Alpaca's prompt: a system text, then `### Instruction:` / `### Response:` sections
    "alpaca": ("{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
               "{% elif message['role'] == 'user' %}{{ '### Instruction:\\n' + message['content'] + '\\n\\n' }}"
               "{% elif message['role'] == 'assistant' %}{{ '### Response:\\n' + message['content'] + eos_token + '\\n\\n' }}"
               "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}"),
    # Mistral's instruction format: [INST] user [/INST] answer</s>, a system text opening the first turn
    "mistral": ("{{ bos_token }}{% set ns = namespace(system='') %}{% for message in messages %}"
                "{% if message['role'] == 'system' %}{% set ns.system = message['content'] + '\\n\\n' %}"
                "{% elif message['role'] == 'user' %}{{ '[INST] ' + ns.system + message['content'] + ' [/INST]' }}"
                "{% set ns.system = '' %}{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
                "{% endif %}{% endfor %}"),
    # LG's EXAONE 3 format: [|role|]text, turns closed by [|endofturn|]
    "exaone": ("{% for message in messages %}{% if message['role'] == 'assistant' %}"
               "{{ '[|assistant|]' + message['content'] + '[|endofturn|]\\n' }}"
               "{% elif message['role'] == 'system' %}{{ '[|system|]' + message['content'] + '[|endofturn|]\\n' }}"
               "{% else %}{{ '[|' + message['role'] + '|]' + message['content'] + '\\n' }}{% endif %}{% endfor %}"
               "{% if add_generation_prompt %}{{ '[|assistant|]' }}{% endif %}"),
}


def is_template_text(value: str) -> bool:
    return "{{" in value or "{%" in value


def check_choice(value: object) -> None:
    """A `chat_template` value that can mean something (the models are checked later)."""
    if not isinstance(value, str) or not value.strip():
        raise RecipeError(f"chat_template must be auto, {', '.join(BUILTIN)}, one of the models, or a Jinja "
                          f"template, got {value!r}.")


def read_template(folder: Path | None, name: str = "model") -> str | None:
    """The chat template a tokenizer folder holds (None: none)."""
    if folder is None:
        return None
    path = side_file(folder, "chat_template.jinja", name)
    if path is not None:
        return path.read_text()
    for file in ("chat_template.json", "tokenizer_config.json"):
        path = side_file(folder, file, name)
        if path is None:
            continue
        try:
            value = json.loads(path.read_text()).get("chat_template")
        except (ValueError, AttributeError):
            continue
        if isinstance(value, list):  # named templates: the default one, else the first
            named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
            value = named.get("default") or next(iter(named.values()), None)
        if isinstance(value, str) and value:
            return value
    return None


def choose(choice: str | None, names: Sequence[str], specs: Sequence[Sequence[str]], folders: Sequence[Path | None],
           source: int) -> tuple[str | None, str | None, list[str]]:
    """(template, where it came from, warnings) for the output.

    `names[i]`/`specs[i]`/`folders[i]`: input i (0 = base) — its display name, the references that
    name it, its local folder; `source`: the tokenizer source's index.
    """
    templates = [read_template(f, n) for f, n in zip(folders, names)]
    warnings: list[str] = []
    if choice is not None and choice != "auto":
        if choice in BUILTIN:
            return BUILTIN[choice], f"the built-in {choice} format", warnings
        for i, refs in enumerate(specs):
            if choice in refs:
                if templates[i] is None:
                    raise RecipeError(f"chat_template {choice!r}: that model has no chat template.",
                                      hint="Name a model that has one, use auto, or give the template text.")
                return templates[i], names[i], warnings
        if is_template_text(choice):
            return choice, "the recipe", warnings
        raise RecipeError(f"Invalid chat template {choice!r}: neither auto, {', '.join(BUILTIN)}, one of the models, "
                          "nor a Jinja template (no '{{' or '{%').",
                          hint="mergekit refuses it too ('Invalid chat template').")
    if choice is None and templates[source] is not None:
        return None, None, warnings  # the tokenizer source's own, copied with its files
    pool = [(i, t) for i, t in enumerate(templates) if t is not None and (choice == "auto" or i != source)]
    if not pool:
        return None, None, warnings
    counts = Counter(t for _, t in pool)
    best = max(counts.values())
    i, template = next((i, t) for i, t in pool if counts[t] == best)
    if len(counts) > 1:
        others = ", ".join(names[j] for j, t in pool if t != template)
        warnings.append(f"the models' chat templates differ: the output takes {names[i]}'s "
                        f"({best} of {len(pool)} have it), not the one of {others}; "
                        "choose with --chat-template (chat_template: in a recipe)")
    if choice is None:
        warnings.append(f"{names[source]} (the tokenizer source) has no chat template: the output takes "
                        f"{names[i]}'s")
    return template, names[i], warnings


def write_template(work: Path, template: str) -> None:
    """Put `template` in the output tokenizer: chat_template.jinja, and tokenizer_config.json's field
    when the copied config has one (so neither file contradicts the other)."""
    (work / "chat_template.jinja").write_text(template)
    (work / "chat_template.json").unlink(missing_ok=True)
    config = work / "tokenizer_config.json"
    if config.is_file():
        try:
            data = json.loads(config.read_text())
        except ValueError:
            return
        if isinstance(data, dict) and "chat_template" in data:
            data["chat_template"] = template
            config.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def plan_template(plan):
    """The plan with its output chat template decided (inputs in local folders by now), said in its notes."""
    from dataclasses import replace

    inputs = plan.inputs
    opts = plan.options
    specs = [[r for r in (i.ref.spec, i.ref.display, i.ref.repo_id, str(i.ref.local_path)) if r] for i in inputs]
    specs[0].append("base")
    template, where, warnings = choose(opts.chat_template, [i.name for i in inputs], specs,
                                       [i.ref.local_path for i in inputs], plan.tokenizer_source)
    for w in warnings:
        log.warning("warning: %s", w)
    notes = [f"chat template: {where}'s" if where in [i.name for i in inputs] else f"chat template: {where}"] if where else []
    for n in notes:
        log.info("note: %s", n)
    return replace(plan.with_notes(notes, warnings), chat_template=template)
