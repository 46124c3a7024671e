"""Chat templates (rendered as transformers renders them) and JSONL field mapping.

The chat-template strings below are the real ones of Llama-3.1-8B-Instruct, Qwen2.5-7B-Instruct
and gemma-2-9b-it (their tokenizer_config.json). Each goes, with the special tokens it uses, into
a tiny byte-level BPE tokenizer trained here; transformers loads the same folder, and our rendered
text and token ids must equal its `apply_chat_template` output.
"""

import json
import logging

import numpy as np
import pytest
import tokenizers as hf_tokenizers
import transformers

from selfplay_jax import chat, config_lib, config_validation, setup, tokenizers
from selfplay_jax.data import encoding
from selfplay_jax.data import pipeline as P
from selfplay_jax.errors import ConfigError, DataError, TokenizerError

# Llama-3.1-8B-Instruct (tokenizer_config.json "chat_template").
LLAMA31 = "{{- bos_token }}\n{%- if custom_tools is defined %}\n    {%- set tools = custom_tools %}\n{%- endif %}\n{%- if not tools_in_user_message is defined %}\n    {%- set tools_in_user_message = true %}\n{%- endif %}\n{%- if not date_string is defined %}\n    {%- set date_string = \"26 Jul 2024\" %}\n{%- endif %}\n{%- if not tools is defined %}\n    {%- set tools = none %}\n{%- endif %}\n\n{#- This block extracts the system message, so we can slot it into the right place. #}\n{%- if messages[0]['role'] == 'system' %}\n    {%- set system_message = messages[0]['content']|trim %}\n    {%- set messages = messages[1:] %}\n{%- else %}\n    {%- set system_message = \"\" %}\n{%- endif %}\n\n{#- System message + builtin tools #}\n{{- \"<|start_header_id|>system<|end_header_id|>\\n\\n\" }}\n{%- if builtin_tools is defined or tools is not none %}\n    {{- \"Environment: ipython\\n\" }}\n{%- endif %}\n{%- if builtin_tools is defined %}\n    {{- \"Tools: \" + builtin_tools | reject('equalto', 'code_interpreter') | join(\", \") + \"\\n\\n\"}}\n{%- endif %}\n{{- \"Cutting Knowledge Date: December 2023\\n\" }}\n{{- \"Today Date: \" + date_string + \"\\n\\n\" }}\n{%- if tools is not none and not tools_in_user_message %}\n    {{- \"You have access to the following functions. To call a function, please respond with JSON for a function call.\" }}\n    {{- 'Respond in the format {\"name\": function name, \"parameters\": dictionary of argument name and its value}.' }}\n    {{- \"Do not use variables.\\n\\n\" }}\n    {%- for t in tools %}\n        {{- t | tojson(indent=4) }}\n        {{- \"\\n\\n\" }}\n    {%- endfor %}\n{%- endif %}\n{{- system_message }}\n{{- \"<|eot_id|>\" }}\n\n{#- Custom tools are passed in a user message with some extra guidance #}\n{%- if tools_in_user_message and not tools is none %}\n    {#- Extract the first user message so we can plug it in here #}\n    {%- if messages | length != 0 %}\n        {%- set first_user_message = messages[0]['content']|trim %}\n        {%- set messages = messages[1:] %}\n    {%- else %}\n        {{- raise_exception(\"Cannot put tools in the first user message when there's no first user message!\") }}\n{%- endif %}\n    {{- '<|start_header_id|>user<|end_header_id|>\\n\\n' -}}\n    {{- \"Given the following functions, please respond with a JSON for a function call \" }}\n    {{- \"with its proper arguments that best answers the given prompt.\\n\\n\" }}\n    {{- 'Respond in the format {\"name\": function name, \"parameters\": dictionary of argument name and its value}.' }}\n    {{- \"Do not use variables.\\n\\n\" }}\n    {%- for t in tools %}\n        {{- t | tojson(indent=4) }}\n        {{- \"\\n\\n\" }}\n    {%- endfor %}\n    {{- first_user_message + \"<|eot_id|>\"}}\n{%- endif %}\n\n{%- for message in messages %}\n    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}\n        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}\n    {%- elif 'tool_calls' in message %}\n        {%- if not message.tool_calls|length == 1 %}\n            {{- raise_exception(\"This model only supports single tool-calls at once!\") }}\n        {%- endif %}\n        {%- set tool_call = message.tool_calls[0].function %}\n        {%- if builtin_tools is defined and tool_call.name in builtin_tools %}\n            {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}\n            {{- \"<|python_tag|>\" + tool_call.name + \".call(\" }}\n            {%- for arg_name, arg_val in tool_call.arguments | items %}\n                {{- arg_name + '=\"' + arg_val + '\"' }}\n                {%- if not loop.last %}\n                    {{- \", \" }}\n                {%- endif %}\n                {%- endfor %}\n            {{- \")\" }}\n        {%- else  %}\n            {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}\n            {{- '{\"name\": \"' + tool_call.name + '\", ' }}\n            {{- '\"parameters\": ' }}\n            {{- tool_call.arguments | tojson }}\n            {{- \"}\" }}\n        {%- endif %}\n        {%- if builtin_tools is defined %}\n            {#- This means we're in ipython mode #}\n            {{- \"<|eom_id|>\" }}\n        {%- else %}\n            {{- \"<|eot_id|>\" }}\n        {%- endif %}\n    {%- elif message.role == \"tool\" or message.role == \"ipython\" %}\n        {{- \"<|start_header_id|>ipython<|end_header_id|>\\n\\n\" }}\n        {%- if message.content is mapping or message.content is iterable %}\n            {{- message.content | tojson }}\n        {%- else %}\n            {{- message.content }}\n        {%- endif %}\n        {{- \"<|eot_id|>\" }}\n    {%- endif %}\n{%- endfor %}\n{%- if add_generation_prompt %}\n    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n{%- endif %}\n"

# Qwen2.5-7B-Instruct (tokenizer_config.json "chat_template").
QWEN25 = "{%- if tools %}\n    {{- '<|im_start|>system\\n' }}\n    {%- if messages[0]['role'] == 'system' %}\n        {{- messages[0]['content'] }}\n    {%- else %}\n        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}\n    {%- endif %}\n    {{- \"\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>\" }}\n    {%- for tool in tools %}\n        {{- \"\\n\" }}\n        {{- tool | tojson }}\n    {%- endfor %}\n    {{- \"\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, \\\"arguments\\\": <args-json-object>}\\n</tool_call><|im_end|>\\n\" }}\n{%- else %}\n    {%- if messages[0]['role'] == 'system' %}\n        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n    {%- else %}\n        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}\n    {%- endif %}\n{%- endif %}\n{%- for message in messages %}\n    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) or (message.role == \"assistant\" and not message.tool_calls) %}\n        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n    {%- elif message.role == \"assistant\" %}\n        {{- '<|im_start|>' + message.role }}\n        {%- if message.content %}\n            {{- '\\n' + message.content }}\n        {%- endif %}\n        {%- for tool_call in message.tool_calls %}\n            {%- if tool_call.function is defined %}\n                {%- set tool_call = tool_call.function %}\n            {%- endif %}\n            {{- '\\n<tool_call>\\n{\"name\": \"' }}\n            {{- tool_call.name }}\n            {{- '\", \"arguments\": ' }}\n            {{- tool_call.arguments | tojson }}\n            {{- '}\\n</tool_call>' }}\n        {%- endfor %}\n        {{- '<|im_end|>\\n' }}\n    {%- elif message.role == \"tool\" %}\n        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != \"tool\") %}\n            {{- '<|im_start|>user' }}\n        {%- endif %}\n        {{- '\\n<tool_response>\\n' }}\n        {{- message.content }}\n        {{- '\\n</tool_response>' }}\n        {%- if loop.last or (messages[loop.index0 + 1].role != \"tool\") %}\n            {{- '<|im_end|>\\n' }}\n        {%- endif %}\n    {%- endif %}\n{%- endfor %}\n{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n{%- endif %}\n"

# gemma-2-9b-it (tokenizer_config.json "chat_template").
GEMMA2 = "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"

# name -> (template, special tokens added to the vocabulary, tokenizer_config.json token entries)
FAMILIES = {
    "llama3.1": (LLAMA31, ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                           "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>", "<|python_tag|>"],
                 {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}),
    "qwen2.5": (QWEN25, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}),
    "gemma2": (GEMMA2, ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"],
               {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>",
                "unk_token": "<unk>"}),
}
CORPUS = ["What is 2+2? The answer is 4. 17+25=42 ####42", "system user assistant model",
          "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
          "Cutting Knowledge Date: December 2023 Today Date: 26 Jul 2024",
          "Be brief. Think step by step. Natalia sold clips to 48 of her friends. ü é 日本"]
USER = {"role": "user", "content": "What is 2+2?"}
CONVERSATIONS = {
    "user": [USER],
    "system": [{"role": "system", "content": "Be brief."}, USER],
    "multi_turn": [USER, {"role": "assistant", "content": "4"},
                   {"role": "user", "content": "  And 17+25? <b>&</b> é  "}],
    "system_multi_turn": [{"role": "system", "content": "Think step by step.\n"}, USER,
                          {"role": "assistant", "content": "The answer is 4."},
                          {"role": "user", "content": "Natalia sold clips to 48 of her friends."}],
}


def write_tokenizer(folder, specials, token_config, template=None, template_file=None,
                    extra_tokens=()):
  """A byte-level BPE tokenizer.json (trained here) + tokenizer_config.json [+ chat_template.jinja]."""
  folder.mkdir(parents=True, exist_ok=True)
  tok = hf_tokenizers.Tokenizer(hf_tokenizers.models.BPE())
  tok.pre_tokenizer = hf_tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = hf_tokenizers.decoders.ByteLevel()
  trainer = hf_tokenizers.trainers.BpeTrainer(
      vocab_size=500, special_tokens=list(specials), show_progress=False,
      initial_alphabet=hf_tokenizers.pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(CORPUS * 20, trainer)
  if extra_tokens:
    tok.add_tokens(list(extra_tokens))
  tok.save(str(folder / "tokenizer.json"))
  config = {"tokenizer_class": "PreTrainedTokenizerFast", **token_config}
  if template is not None:
    config["chat_template"] = template
  (folder / "tokenizer_config.json").write_text(json.dumps(config))
  if template_file is not None:
    (folder / chat.TEMPLATE_FILE).write_text(template_file)
  return folder


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp("chat")
  return {name: write_tokenizer(root / name, specials, cfg, template)
          for name, (template, specials, cfg) in FAMILIES.items()}


def hf_ids(hf, messages, add_generation_prompt=True):
  out = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
  return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)


# ---- rendering: parity with transformers ----------------------------------------------------------


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_rendered_text_and_ids_equal_transformers(family, family_dirs):
  hf = transformers.AutoTokenizer.from_pretrained(family_dirs[family])
  ours = tokenizers.load_tokenizer(family_dirs[family])
  assert ours.chat_template == FAMILIES[family][0]
  checked = 0
  for name, messages in CONVERSATIONS.items():
    if family == "gemma2" and name.startswith("system"):
      continue  # Gemma's template rejects system messages (below)
    for gen in (True, False):
      expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
      text = ours.render_chat(messages, add_generation_prompt=gen)
      assert text == expected, (family, name, gen)
      # Encoded as is (no BOS added): the ids transformers gets for the same chat.
      assert ours.encode(text) == hf_ids(hf, messages, gen), (family, name, gen)
      checked += 1
  assert checked >= 4
  if family in ("llama3.1", "gemma2"):  # the template writes BOS, exactly once
    text = ours.render_chat(CONVERSATIONS["user"])
    assert ours.encode(text).count(ours.bos_id) == 1 and ours.encode(text)[0] == ours.bos_id


def test_gemma_template_rejects_a_system_message_as_transformers_does(family_dirs):
  ours = tokenizers.load_tokenizer(family_dirs["gemma2"])
  hf = transformers.AutoTokenizer.from_pretrained(family_dirs["gemma2"])
  with pytest.raises(Exception, match="System role not supported"):
    hf.apply_chat_template(CONVERSATIONS["system"], tokenize=False)
  with pytest.raises(chat.ChatTemplateError, match="System role not supported"):
    ours.render_chat(CONVERSATIONS["system"])
  with pytest.raises(chat.ChatTemplateError, match="must alternate"):
    ours.render_chat([USER, USER])


def test_environment_matches_transformers_filters_and_loop_controls(tmp_path):
  """tojson without HTML escaping (indent, non-ASCII), trim/lstrip blocks, break/continue,
  namespace, raise_exception, the {% generation %} tag: one template using them, rendered by
  both."""
  template = ("{%- set ns = namespace(n=0) %}\n"
              "{% for m in messages %}\n"
              "  {% if m.role == 'skip' %}{% continue %}{% endif %}\n"
              "  {% if loop.index > 3 %}{% break %}{% endif %}\n"
              "  {% set ns.n = ns.n + 1 %}\n"
              "  {{ m | tojson }}|{{ m | tojson(indent=2) }}|{{ m.content | tojson(ensure_ascii=True) }}\n"
              "  {% if m.role == 'assistant' %}{% generation %}[{{ m.content }}]{% endgeneration %}{% endif %}\n"
              "{% endfor %}\n"
              "{{ ns.n }} {{ eos_token }}{% if add_generation_prompt %}GO{% endif %}")
  path = write_tokenizer(tmp_path / "t", ["<s>", "</s>"], {"eos_token": "</s>"}, template)
  messages = [{"role": "user", "content": "<b>a & b</b> é 日本"}, {"role": "skip", "content": "x"},
              {"role": "assistant", "content": "'quoted' \"double\""},
              {"role": "user", "content": "3"}, {"role": "user", "content": "4"}]
  hf = transformers.AutoTokenizer.from_pretrained(path)
  expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
  assert tokenizers.load_tokenizer(path).render_chat(messages) == expected
  assert "<b>a & b</b>" in expected  # not HTML-escaped
  with pytest.raises(chat.ChatTemplateError, match="no"):
    chat.render("{{ raise_exception('no') }}", messages)
  with pytest.raises(chat.ChatTemplateError, match="does not compile"):
    chat.render("{% for %}", messages)


def test_template_sources_jinja_file_and_named_templates(tmp_path):
  """chat_template.jinja wins over tokenizer_config.json; a list of named templates uses
  "default"; each as transformers loads it."""
  specials, cfg = FAMILIES["qwen2.5"][1:]
  both = write_tokenizer(tmp_path / "both", specials, cfg, template=GEMMA2, template_file=QWEN25)
  named = write_tokenizer(tmp_path / "named", specials, cfg,
                          template=[{"name": "tool_use", "template": GEMMA2},
                                    {"name": "default", "template": QWEN25}])
  for path in (both, named):
    ours = tokenizers.load_tokenizer(path)
    assert ours.chat_template == QWEN25
    hf = transformers.AutoTokenizer.from_pretrained(path)
    assert ours.render_chat(CONVERSATIONS["system"]) == hf.apply_chat_template(
        CONVERSATIONS["system"], tokenize=False, add_generation_prompt=True)
  no_default = write_tokenizer(tmp_path / "nodefault", specials, cfg,
                               template=[{"name": "tool_use", "template": QWEN25}])
  with pytest.raises(TokenizerError, match="none named 'default'"):
    tokenizers.load_tokenizer(no_default)
  plain = write_tokenizer(tmp_path / "plain", specials, cfg)
  tok = tokenizers.load_tokenizer(plain)
  assert tok.chat_template is None
  with pytest.raises(TokenizerError, match="has no chat template"):
    tok.render_chat([USER])


def test_sentencepiece_tokenizer_finds_the_template_next_to_it(tmp_path):
  tok = tokenizers.train_sentencepiece(CORPUS, 60, tmp_path / "sp" / "tok", model_type="char",
                                       user_defined_symbols=["<start_of_turn>", "<end_of_turn>"])
  assert tok.chat_template is None
  (tmp_path / "sp" / chat.TEMPLATE_FILE).write_text(GEMMA2)
  tok = tokenizers.load_tokenizer(tmp_path / "sp" / "tok.model")
  # No tokenizer_config.json: bos_token is the piece of the model's own BOS id.
  assert tok.render_chat([USER]) == "<s><start_of_turn>user\nWhat is 2+2?<end_of_turn>\n" \
      "<start_of_turn>model\n"
  assert tok.encode(tok.render_chat([USER]))[0] == tok.bos_id


def test_sentencepiece_control_pieces_in_text_encode_as_their_ids(tmp_path):
  """A rendered template writes "<s>" as text: it must be the BOS id, not the characters."""
  tok = tokenizers.train_sentencepiece(CORPUS, 60, tmp_path / "tok", model_type="char")
  assert tok.encode("<s>ab</s>c") == [tok.bos_id, *tok.encode("ab"), tok.eos_id, *tok.encode("c")]
  assert tok.encode("<s>", add_bos=True) == [tok.bos_id, tok.bos_id]  # asked twice, got twice


def test_export_keeps_the_chat_template(tmp_path, family_dirs):
  from selfplay_jax import export
  tok = tokenizers.load_tokenizer(family_dirs["qwen2.5"])
  out = tmp_path / "hf"
  out.mkdir()
  export._copy_tokenizer(tok, out)  # pylint: disable=protected-access
  assert (out / chat.TEMPLATE_FILE).read_text() == QWEN25
  hf = transformers.AutoTokenizer.from_pretrained(out)
  assert tokenizers.load_tokenizer(out).render_chat(CONVERSATIONS["system"]) == \
      hf.apply_chat_template(CONVERSATIONS["system"], tokenize=False, add_generation_prompt=True)


def test_messages_of_string_list_and_system_prompt():
  assert chat.messages_of("hi") == [{"role": "user", "content": "hi"}]
  assert chat.messages_of("hi", "sys") == [{"role": "system", "content": "sys"},
                                           {"role": "user", "content": "hi"}]
  given = [{"role": "system", "content": "own"}, {"role": "user", "content": "hi"}]
  assert chat.messages_of(given, "sys") == given  # a prompt's own system message stays
  for bad, match in (([], "non-empty list"), (["hi"], "message 0 is a JSON str"),
                     ([{"role": "user"}], "'content' must be a string, got nothing"),
                     ([{"role": 1, "content": "x"}], "'role' must be a string, got int")):
    with pytest.raises(ValueError, match=match):
      chat.messages_of(bad)


# ---- JSONL prompts under the chat format ----------------------------------------------------------

LENS = dict(max_prompt_len=128, max_response_len=16, max_answer_len=4)


def _write_jsonl(path, rows):
  path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
  return path


def test_chat_rows_are_the_rendered_template_encoded_like_transformers(tmp_path, family_dirs):
  ours = tokenizers.load_tokenizer(family_dirs["llama3.1"])
  hf = transformers.AutoTokenizer.from_pretrained(family_dirs["llama3.1"])
  rows = [{"prompt": "What is 2+2?", "answer": 4},
          {"prompt": [{"role": "system", "content": "Think step by step."}, USER], "answer": "4"},
          {"prompt": CONVERSATIONS["multi_turn"], "answer": "42"}]
  path = _write_jsonl(tmp_path / "chat.jsonl", rows)
  loaded, report = P.load_jsonl(path, tokenizer=ours, prompt_format="chat",
                                system_prompt="Be brief.", **LENS)
  assert report.num_skipped == 0
  expected = [[{"role": "system", "content": "Be brief."}, USER],  # string -> user message
              rows[1]["prompt"],  # its own system message stays
              [{"role": "system", "content": "Be brief."}, *CONVERSATIONS["multi_turn"]]]
  for row, messages in zip(loaded, expected):
    assert row["prompt"] == hf.apply_chat_template(messages, tokenize=False,
                                                   add_generation_prompt=True)
  assert [r["fields"] for r in loaded] == rows  # the JSON objects, unchanged
  batch = encoding.encode_examples(loaded, ours, **LENS)
  for i, messages in enumerate(expected):
    got = batch["prompt_tokens"][i][batch["prompt_mask"][i]].tolist()
    assert got == hf_ids(hf, messages)  # one BOS: the template's
  # The length check uses the same ids: a prompt exactly at the limit is kept, one over skipped.
  width = len(hf_ids(hf, expected[0]))
  kept, _ = P.load_jsonl(path, tokenizer=ours, prompt_format="chat", system_prompt="Be brief.",
                         **{**LENS, "max_prompt_len": width})
  assert [r["fields"] for r in kept] == [r for r, m in zip(rows, expected)
                                         if len(hf_ids(hf, m)) <= width]
  assert rows[0] in [r["fields"] for r in kept]
  with pytest.raises(DataError, match=r"line 1: prompt_too_long \(\d+ tokens > "
                     r"data.max_prompt_len=" + str(width - 1)):
    P.load_jsonl(path, tokenizer=ours, prompt_format="chat", system_prompt="Be brief.",
                 strict=True, **{**LENS, "max_prompt_len": width - 1})


def test_bad_message_rows_are_counted_and_strict_names_the_line(tmp_path, family_dirs):
  ours = tokenizers.load_tokenizer(family_dirs["qwen2.5"])
  rows = [{"prompt": "fine"}, {"prompt": [{"role": "user"}]}, {"prompt": []},
          {"prompt": [{"role": "user", "content": "  "}]}, {"prompt": {"role": "user"}},
          {"question": "x"}]
  path = _write_jsonl(tmp_path / "bad.jsonl", rows)
  loaded, report = P.load_jsonl(path, tokenizer=ours, prompt_format="chat", **LENS)
  assert len(loaded) == 1 and report.counts == {"bad_messages": 2, "empty_prompt": 1,
                                                "wrong_type": 1, "missing_field": 1}
  assert "bad_messages=2 (first: prompt: message 0: 'content' must be a string" in report.summary()
  with pytest.raises(DataError, match=r"bad\.jsonl line 2: bad_messages \(prompt: message 0"):
    P.load_jsonl(path, tokenizer=ours, prompt_format="chat", strict=True, **LENS)


def test_template_errors_are_counted_with_the_templates_message(tmp_path, family_dirs):
  """Gemma's template rejects a system prompt: every row fails, and the error quotes it."""
  ours = tokenizers.load_tokenizer(family_dirs["gemma2"])
  path = _write_jsonl(tmp_path / "g.jsonl", [{"prompt": "a"}, {"prompt": "b"}])
  assert len(P.load_jsonl(path, tokenizer=ours, prompt_format="chat", **LENS)[0]) == 2
  with pytest.raises(DataError, match="template_error=2 .first: the chat template rejects the "
                     "conversation: System role not supported"):
    P.load_jsonl(path, tokenizer=ours, prompt_format="chat", system_prompt="sys", **LENS)


def test_raw_format_with_messages_is_an_error_naming_the_key(tmp_path, family_dirs):
  ours = tokenizers.load_tokenizer(family_dirs["qwen2.5"])
  path = _write_jsonl(tmp_path / "m.jsonl", [{"prompt": "ok"}, {"question": [USER]}])
  with pytest.raises(DataError, match=r"m\.jsonl line 2: .*question is a list of chat messages.*"
                     "data.prompt_format=chat"):
    P.load_jsonl(path, tokenizer=ours, field_names={"prompt": "question"}, **LENS)
  plain = tokenizers.load_tokenizer(write_tokenizer(tmp_path / "plain", *FAMILIES["qwen2.5"][1:]))
  with pytest.raises(TokenizerError, match="needs a chat template"):
    P.load_jsonl(path, tokenizer=plain, prompt_format="chat", **LENS)


# ---- field mapping --------------------------------------------------------------------------------

GSM8K = [
    {"question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many "
                 "clips in May. How many clips did Natalia sell altogether in April and May?",
     "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 "
               "clips altogether in April and May.\n#### 72"},
    {"question": "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of "
                 "babysitting. How much did she earn?",
     "answer": "Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\nWorking 50 minutes, she earned "
               "0.2 x 50 = $<<0.2*50=10>>10.\n#### 10"},
]
MATH = [
    {"problem": "What is $\\sqrt{16}$?", "solution": "$\\sqrt{16} = \\boxed{4}$.",
     "level": "Level 1", "type": "Prealgebra"},
    {"problem": "Simplify $\\frac{6}{8}$.", "solution": "Divide by 2: $\\boxed{\\frac{3}{4}}$.",
     "level": "Level 2", "type": "Algebra"},
]
WIDE = dict(max_prompt_len=4096, max_response_len=4096, max_answer_len=64)


@pytest.fixture(scope="module")
def byte_tok(family_dirs):
  return tokenizers.load_tokenizer(family_dirs["qwen2.5"])


def test_final_answer_is_what_follows_the_last_marker():
  assert P.final_answer(GSM8K[0]["answer"], "####") == "72"
  assert P.final_answer("a #### 1 #### 72 \n", "####") == "72"
  assert P.final_answer("72", "####") == "72" and P.final_answer("x####", "####") == ""
  assert P.final_answer("The answer is 4", "Answer:") == "The answer is 4"


def test_gsm8k_rows_load_unchanged_through_the_mapping(tmp_path, byte_tok):
  path = _write_jsonl(tmp_path / "gsm8k.jsonl", GSM8K)
  rows, report = P.load_jsonl(path, tokenizer=byte_tok, require=("prompt", "answer", "response"),
                              field_names={"prompt": "question", "answer": "answer",
                                           "response": "answer"}, **WIDE)
  assert report.num_skipped == 0
  assert [r["prompt"] for r in rows] == [g["question"] for g in GSM8K]
  assert [r["answer"] for r in rows] == ["72", "10"]  # after the last ####
  assert [r["response"] for r in rows] == [g["answer"] for g in GSM8K]  # the whole solution
  assert [r["fields"] for r in rows] == GSM8K
  batch = encoding.encode_examples(rows, byte_tok, **WIDE)  # `fields` is ignored
  got = batch["answer_tokens"][0][batch["answer_mask"][0]].tolist()
  assert got == byte_tok.encode("72")


def test_math_rows_load_with_the_prompt_field_and_keep_every_field(tmp_path, byte_tok):
  path = _write_jsonl(tmp_path / "math.jsonl", MATH)
  rows, _ = P.load_jsonl(path, tokenizer=byte_tok, field_names={"prompt": "problem"}, **WIDE)
  assert [r["prompt"] for r in rows] == [m["problem"] for m in MATH]
  assert [r["answer"] for r in rows] == ["", ""]  # no "answer" key: the math reward reads fields
  assert [r["fields"] for r in rows] == MATH
  rows, _ = P.load_jsonl(path, tokenizer=byte_tok, field_names={"prompt": "problem",
                                                                "answer": "solution"}, **WIDE)
  assert [r["answer"] for r in rows] == [m["solution"] for m in MATH]  # no marker: unchanged


def test_errors_name_the_mapped_json_key(tmp_path, byte_tok):
  bad = [({"prompt": "no question"}, "missing_field .no 'question' field"),
         ({"question": 7, "answer": "#### 7"}, "wrong_type .question must be a string, got int"),
         ({"question": "q", "answer": ["#### 7"]},
          "wrong_type .answer must be a string or number, got list")]
  path = _write_jsonl(tmp_path / "g.jsonl", [GSM8K[0], *(row for row, _ in bad)])
  names = {"prompt": "question"}
  rows, report = P.load_jsonl(path, tokenizer=byte_tok, field_names=names, **WIDE)
  assert len(rows) == 1 and report.counts == {"missing_field": 1, "wrong_type": 2}
  assert "no 'question' field in 1 row(s)" in report.summary()
  for i, (row, match) in enumerate(bad):
    one = _write_jsonl(tmp_path / f"l{i}.jsonl", [GSM8K[0], row])
    with pytest.raises(DataError, match=r"line 2: " + match):
      P.load_jsonl(one, tokenizer=byte_tok, strict=True, field_names=names, **WIDE)
  missing = _write_jsonl(tmp_path / "m.jsonl", [{"question": "q"}])
  with pytest.raises(DataError, match="no 'solution' field; the math reward needs it"):
    P.load_jsonl(missing, tokenizer=byte_tok, strict=True, require=("answer",),
                 field_names={"prompt": "question", "answer": "solution"},
                 why={"answer": "the math reward needs it"}, **WIDE)
  with pytest.raises(ValueError, match="field_names must map fields of"):
    P.load_jsonl(missing, tokenizer=byte_tok, field_names={"question": "prompt"}, **WIDE)


def test_heldout_split_and_leak_check_use_the_mapped_prompts(tmp_path, byte_tok, caplog):
  rows = [{"question": f"What is {i}+{i}?", "answer": f"{i}+{i}={2 * i}\n#### {2 * i}", "id": i}
          for i in range(40)]
  path = _write_jsonl(tmp_path / "train.jsonl", rows)
  names = {"prompt": "question"}
  data = P.JsonlData.load(str(path), tokenizer=byte_tok, heldout_fraction=0.25,
                          field_names=names, **WIDE)
  assert len(data.train_rows) + len(data.heldout_rows) == 40 and data.heldout_rows
  train_q = {r["fields"]["question"] for r in data.train_rows}
  assert not train_q & {r["prompt"] for r in data.heldout_rows}
  assert data.has_answers and all(r["answer"] == str(2 * r["fields"]["id"])
                                  for r in data.train_rows + data.heldout_rows)
  evals = P.eval_batches(data, "heldout", tokenizer=byte_tok, batch_size=4, **WIDE)
  assert int(sum(b["valid"].sum() for b in evals)) == len(data.heldout_rows)
  it = P.make_iterator(data.source("train"), tokenizer=byte_tok, batch_size=4, seed=0,
                       process_index=0, process_count=1, **WIDE)
  batch = next(it)  # grain batches rows holding `fields`; only arrays come out
  assert all(isinstance(v, np.ndarray) for v in batch.values()) and "fields" not in batch
  assert batch["prompt_tokens"].shape == (4, WIDE["max_prompt_len"])
  # The split hashes the prompt as the file gives it: rendering it (chat) moves no row.
  chat_data = P.JsonlData.load(str(path), tokenizer=byte_tok, heldout_fraction=0.25,
                               field_names=names, prompt_format="chat", system_prompt="sys",
                               **WIDE)
  assert [r["fields"] for r in chat_data.heldout_rows] == [r["fields"] for r in data.heldout_rows]
  assert chat_data.heldout_rows[0]["prompt"].startswith("<|im_start|>system\nsys<|im_end|>")
  heldout = _write_jsonl(tmp_path / "heldout.jsonl", rows[:3])
  with caplog.at_level(logging.WARNING):
    P.JsonlData.load(str(path), tokenizer=byte_tok, eval_path=str(heldout), field_names=names,
                     **WIDE)
  assert any("3 of its 3 held-out prompts are also training prompts" in r.getMessage()
             for r in caplog.records)


# ---- config keys ----------------------------------------------------------------------------------


def _config(*overrides):
  cfg = config_lib.load_config(str(config_lib.default_config_path()), list(overrides))
  config_validation.validate(cfg)
  return cfg


def test_config_keys_reach_the_loaded_rows(tmp_path, family_dirs):
  path = _write_jsonl(tmp_path / "gsm8k.jsonl", GSM8K * 10)
  cfg = _config(f"data.task={path}", f"model.tokenizer_path={family_dirs['llama3.1']}",
                "data.prompt_format=chat", "data.system_prompt=Reason step by step.",
                "data.prompt_field=question", "data.answer_field=answer",
                "data.response_field=answer", "data.max_prompt_len=200",
                "data.max_response_len=200", "data.eval_path=" + str(path))
  data, tok = setup.task_and_tokenizer(cfg, tmp_path / "run")
  hf = transformers.AutoTokenizer.from_pretrained(family_dirs["llama3.1"])
  row = data.train_rows[0]
  assert row["prompt"] == hf.apply_chat_template(
      [{"role": "system", "content": "Reason step by step."},
       {"role": "user", "content": GSM8K[0]["question"]}], tokenize=False, add_generation_prompt=True)
  assert (row["answer"], row["response"], row["fields"]) == ("72", GSM8K[0]["answer"], GSM8K[0])


def test_config_errors_name_the_key(tmp_path, family_dirs):
  path = _write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a"}])
  for overrides, match in (
      (["data.prompt_format=jinja"], "data.prompt_format: must be 'raw' or 'chat', got 'jinja'"),
      (["data.prompt_field="], "data.prompt_field: must be a non-empty JSON key"),
      (["data.rejected_field="], "data.rejected_field: must be a non-empty JSON key"),
      (["data.prompt_format=chat"], "data.prompt_format: 'chat' renders JSONL prompts .* "
       "data.task='arithmetic' is not a .jsonl file"),
      ([f"data.task={path}", "data.system_prompt=Be brief."],
       "data.system_prompt: a system message needs data.prompt_format=chat")):
    with pytest.raises(ConfigError, match=overrides and match):
      _config(*overrides)
  plain = write_tokenizer(tmp_path / "plain", *FAMILIES["qwen2.5"][1:])
  cfg = _config(f"data.task={path}", f"model.tokenizer_path={plain}", "data.prompt_format=chat")
  with pytest.raises(ConfigError, match=r"data.prompt_format: 'chat' .* the tokenizer at .*plain "
                     "has none"):
    setup.task_and_tokenizer(cfg, tmp_path / "run")


# ---- generate --chat ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory):
  """A tiny random Llama with the Gemma-2 template tokenizer (BOS written by the template)."""
  from tests.hf_models import make_hf_model
  template, specials, token_config = FAMILIES["gemma2"]
  path = write_tokenizer(tmp_path_factory.mktemp("chatgen"), specials, token_config, template)
  tok = tokenizers.load_tokenizer(path)
  model = make_hf_model("llama", seed=3, vocab_size=tok.vocab_size, bos_token_id=tok.bos_id,
                        eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
  model.save_pretrained(path, safe_serialization=True)
  return path, model


@pytest.mark.slow
def test_generate_chat_samples_from_the_rendered_template(chat_model_dir):
  import torch

  from selfplay_jax import generate
  from selfplay_jax.sampling import SamplingConfig
  path, model = chat_model_dir
  hf = transformers.AutoTokenizer.from_pretrained(path)
  prompt = "What is 2+2?"
  out = generate.generate_text(path, [prompt], SamplingConfig(max_new_tokens=6, temperature=0.0),
                               chat=True)
  messages = [{"role": "user", "content": prompt}]
  assert out[0].prompt == hf.apply_chat_template(messages, tokenize=False,
                                                 add_generation_prompt=True)
  ids = hf_ids(hf, messages)
  with torch.no_grad():
    ref = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         do_sample=False, max_new_tokens=6, eos_token_id=model.config.eos_token_id,
                         pad_token_id=model.config.pad_token_id)[0, len(ids):].tolist()
  assert out[0].tokens[0] == ref[:len(out[0].tokens[0])] and len(out[0].tokens[0]) >= 1
  with pytest.raises(ValueError, match="needs chat=True"):
    generate.generate_text(path, [prompt], SamplingConfig(), system_prompt="sys")
  with pytest.raises(chat.ChatTemplateError, match="System role not supported"):
    generate.generate_text(path, [prompt], SamplingConfig(), chat=True, system_prompt="sys")


def test_generate_chat_without_a_template_names_the_tokenizer(tmp_path):
  from selfplay_jax import generate
  from selfplay_jax.sampling import SamplingConfig
  path = write_tokenizer(tmp_path / "plain", *FAMILIES["qwen2.5"][1:])
  with pytest.raises(TokenizerError, match="plain.tokenizer.json has no chat template"):
    generate.generate_text(path, ["hi"], SamplingConfig(), chat=True)  # before any weights load


@pytest.mark.slow
def test_generate_cli_chat(chat_model_dir):
  import os
  import subprocess
  import sys
  path, _ = chat_model_dir
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  res = subprocess.run([sys.executable, "-m", "selfplay_jax.cli", "generate", f"--model={path}",
                        "--chat", "--prompt=What is 2+2?", "--max_new_tokens=4"], env=env,
                       capture_output=True, text=True, timeout=300)
  assert res.returncode == 0, res.stderr
  assert res.stdout.startswith("<bos><start_of_turn>user\nWhat is 2+2?<end_of_turn>\n"
                               "<start_of_turn>model\n")


# ---- one tiny run: the sample dump shows the rendered prompt --------------------------------------


@pytest.mark.slow
def test_training_on_chat_rows_dumps_the_rendered_prompts(tmp_path):
  """GSM8K-style rows (question / solution ending "#### n") under the Gemma-2 template: one tiny
  GRPO round trains, and its sample dump's prompts are transformers' rendered text."""
  from selfplay_jax import train
  from tests.test_train import OVERRIDES
  template, specials, token_config = FAMILIES["gemma2"]
  tok_dir = write_tokenizer(tmp_path / "tok", specials, token_config, template,
                            extra_tokens=["####"])
  rows = [{"question": f"What is {a}+{b}?", "answer": f"{a}+{b}={a + b}\n#### {a + b}"}
          for a in range(1, 9) for b in range(1, 9)]
  path = _write_jsonl(tmp_path / "data.jsonl", rows)
  cfg = _config(*OVERRIDES, "warmup.rounds=0", "rounds=1", "metrics.plot_every_rounds=0",
                f"data.task={path}", f"model.tokenizer_path={tok_dir}", "data.prompt_format=chat",
                "data.prompt_field=question", "data.response_field=answer",
                "data.max_prompt_len=24", "data.max_response_len=24", "data.max_answer_len=4")
  train.train_and_evaluate(cfg, tmp_path / "run")
  dump = [json.loads(line) for line in
          (tmp_path / "run" / "samples" / "round_0001.jsonl").read_text().splitlines()]
  hf = transformers.AutoTokenizer.from_pretrained(tok_dir)
  rendered = {hf.apply_chat_template([{"role": "user", "content": r["question"]}], tokenize=False,
                                     add_generation_prompt=True) for r in rows}
  assert len(dump) == 8 and all(s["prompt"] in rendered for s in dump)
  assert all(s["prompt"].startswith("<bos><start_of_turn>user\nWhat is ") for s in dump)
  assert all(s["reward"] in (0.0, 1.0) for s in dump)  # the verifier scored against "#### n"
