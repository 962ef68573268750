"""dsv3 chat-template renders exactly what transformers' apply_chat_template renders (jinja2 with
trim_blocks and lstrip_blocks), for DeepSeek-V3's template on many generated conversations and for other
templates that use more of Jinja."""
import json
import os
import random

import pytest

from dsv3_cli import BUNDLED, minimal_tokenizer_dir, run

jinja2 = pytest.importorskip("jinja2")
chat_utils = pytest.importorskip("transformers.utils.chat_template_utils")


def reference(template, messages, add_generation_prompt, **kw):
    # transformers' own environment (ImmutableSandboxedEnvironment, trim_blocks, lstrip_blocks, tojson,
    # raise_exception, namespace). Messages are passed as given: transformers 5.17, which produced the
    # fixtures, did not drop None-valued keys before rendering.
    compiled = chat_utils._compile_jinja_template(template)
    return compiled.render(messages=messages, tools=kw.pop("tools", None), documents=None,
                           add_generation_prompt=add_generation_prompt, **kw)


def deepseek_conversations(n, seed=7):
    rng = random.Random(seed)
    words = ["Hello", "world", "你好", "天气", "2+2=4", "naïve", "😀", "\n", "  ", "def f(x):\n    return x", "`code`",
             "<think>", "{\"a\": 1}", "Ünïcödé", "mixed 中文 text", "\t", ""]
    def text():
        return " ".join(rng.choice(words) for _ in range(rng.randint(0, 6)))
    def tool_call():
        args = json.dumps({"city": rng.choice(["Paris", "東京", "New York"]), "n": rng.randint(0, 9)}, ensure_ascii=False)
        return {"type": "function", "function": {"name": rng.choice(["get_weather", "search", "calc"]), "arguments": args}}
    convs = []
    for _ in range(n):
        msgs = []
        for _ in range(rng.randint(0, 2)):
            msgs.append({"role": "system", "content": text()})
        for _ in range(rng.randint(1, 4)):
            msgs.append({"role": "user", "content": text()})
            r = rng.random()
            if r < 0.35:
                msgs.append({"role": "assistant", "content": None, "tool_calls": [tool_call() for _ in range(rng.randint(1, 3))]})
                for _ in range(rng.randint(1, 3)):
                    msgs.append({"role": "tool", "content": text()})
                if rng.random() < 0.7:
                    msgs.append({"role": "assistant", "content": text()})
            elif r < 0.8:
                msgs.append({"role": "assistant", "content": text()})
        rng.shuffle(msgs) if rng.random() < 0.1 else None
        convs.append((msgs, rng.random() < 0.6))
    return convs


def test_deepseek_template_matches_transformers():
    config = json.load(open(os.path.join(BUNDLED, "tokenizer_config.json"), encoding="utf-8"))
    template = config["chat_template"]
    specials = {"bos_token": "<｜begin▁of▁sentence｜>", "eos_token": "<｜end▁of▁sentence｜>",
                "pad_token": "<｜end▁of▁sentence｜>"}
    convs = deepseek_conversations(400)
    expected, inputs = [], []
    for msgs, gen in convs:
        try:
            expected.append(reference(template, msgs, gen, **specials))
        except Exception:
            continue  # conversations the template itself rejects (e.g. a tool call after tool outputs) are skipped
        inputs.append({"messages": msgs, "add_generation_prompt": gen})
    assert len(inputs) > 300
    got = run(["chat-template", "--tokenizer-dir", "deepseek-v3"], inputs)
    assert [g["text"] for g in got] == expected


def test_deepseek_fixture_conversations():
    refs = [json.loads(l) for l in open(os.path.join(os.path.dirname(__file__), "..", "data", "chat_refs.jsonl"),
                                        encoding="utf-8")]
    got = run(["chat-template"], [{"messages": r["messages"], "add_generation_prompt": r["add_generation_prompt"]}
                                  for r in refs])
    assert [g["text"] for g in got] == [r["text"] for r in refs]


# Templates in the style of other models' chat templates, exercising the Jinja features they rely on.
OTHER_TEMPLATES = {
    "chatml_loop": (
        "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"),
    "llama3_style": (
        "{{- bos_token }}\n{%- if messages[0]['role'] == 'system' %}\n    {%- set system_message = messages[0]['content']|trim %}\n"
        "    {%- set messages = messages[1:] %}\n{%- else %}\n    {%- set system_message = \"\" %}\n{%- endif %}\n"
        "{{- \"<|start_header_id|>system<|end_header_id|>\\n\\n\" }}\n{{- system_message }}\n{{- \"<|eot_id|>\" }}\n"
        "{%- for message in messages %}\n    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}\n"
        "{%- endfor %}\n{%- if add_generation_prompt %}\n    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n{%- endif %}\n"),
    "whitespace_blocks": (
        "Conversation:\n  {% for m in messages %}\n    {% if m.role == 'user' %}\n  U: {{ m.content }}\n    {% else %}\n"
        "  A: {{ m.content }}\n    {% endif %}\n  {% endfor %}\n{# a comment #}\n  {%+ if true %}kept{% endif %}\nend\n\n"),
    "loop_vars_and_filters": (
        "{% for m in messages %}{{ loop.index }}/{{ loop.length }}{% if loop.first %}[first]{% endif %}"
        "{% if loop.last %}[last]{% endif %}:{{ m.role|upper }}={{ m.content|length }}|{{ m.content|default('none') }}"
        "{{ ',' if not loop.last }}{% endfor %}\n{{ messages|map(attribute='role')|join(', ') }}\n"
        "{{ messages|selectattr('role', 'equalto', 'user')|list|length }} users\n"
        "{{ (messages|last).content[::-1] }} {{ messages[0]['content'][:3] }} {{ 'x' ~ 3 ~ none }}"),
    "namespace_and_tools": (
        "{% set ns = namespace(count=0, names=[]) %}{% for m in messages %}{% if m.role == 'user' %}"
        "{% set ns.count = ns.count + 1 %}{% endif %}{% endfor %}users={{ ns.count }}\n"
        "{% if tools is not none %}{% for t in tools %}{{ t | tojson }}\n{{ t.function.parameters | tojson(indent=2) }}\n"
        "{% endfor %}{% endif %}{% for m in messages %}{% if m.tool_calls is defined %}"
        "{% for c in m.tool_calls %}{{ c.function.name }}({{ c.function.arguments | tojson }}){% endfor %}{% endif %}{% endfor %}"),
    "macros_and_strings": (
        "{% macro render(m, prefix='> ') %}{{ prefix }}{{ m.content.strip() }}{% endmacro %}"
        "{% for m in messages %}{{ render(m) }}{{ render(m, prefix='* ') }}|{{ m.content.split()|length }}|"
        "{{ m.content.startswith('He') }}|{{ m.content.replace('l', 'L') }}|{{ m['role'] in ['user', 'system'] }}\n{% endfor %}"
        "{{ [1, 2.5, 'a', none, true] }} {{ {'k': 'v', 'n': [1, {'x': none}]} }} {{ 7 // 2 }} {{ 7 % 3 }} {{ -7 // 2 }} {{ 2 ** 10 }} {{ 1 / 4 }}"),
    "raise_on_bad_role": (
        "{% for m in messages %}{% if m.role not in ['user', 'assistant', 'system'] %}"
        "{{ raise_exception('Unknown role: ' + m.role) }}{% endif %}{{ m.content }}{% endfor %}"),
}

OTHER_CONVERSATIONS = [
    [{"role": "system", "content": "  Be brief.  "}, {"role": "user", "content": "Hello there"},
     {"role": "assistant", "content": "Hi! How can I help?"}, {"role": "user", "content": "  Tell me\ta joke \n"}],
    [{"role": "user", "content": "Héllo 世界 😀"}],
    [{"role": "user", "content": "What's the weather?"},
     {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "C", "days": 3, "ratio": 0.5}}}]},
     {"role": "user", "content": "thanks"}],
]

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                         "required": ["city"]}}}]


@pytest.mark.parametrize("name", sorted(OTHER_TEMPLATES))
def test_other_templates_match_jinja2(name, tmp_path):
    template = OTHER_TEMPLATES[name]
    d = minimal_tokenizer_dir(str(tmp_path / name), template)
    inputs, expected = [], []
    for msgs in OTHER_CONVERSATIONS:
        for gen in (False, True):
            for tools in (None, TOOLS):
                kw = {"bos_token": "<s>", "eos_token": "</s>"}
                expected.append(reference(template, msgs, gen, tools=tools, **kw))
                line = {"messages": msgs, "add_generation_prompt": gen}
                if tools is not None:
                    line["tools"] = tools
                inputs.append(line)
    got = run(["chat-template", "--tokenizer-dir", d], inputs)
    assert [g["text"] for g in got] == expected


def test_template_errors_name_the_line(tmp_path):
    d = minimal_tokenizer_dir(str(tmp_path / "bad_role"), OTHER_TEMPLATES["raise_on_bad_role"])
    proc = run(["chat-template", "--tokenizer-dir", d], [{"messages": [{"role": "robot", "content": "x"}]}], check=False)
    assert proc.returncode == 1
    err = proc.stderr.decode()
    assert "Unknown role: robot" in err and "line 1" in err

    d = minimal_tokenizer_dir(str(tmp_path / "unclosed"), "{% for m in messages %}{{ m.content }}")
    proc = run(["chat-template", "--tokenizer-dir", d], [{"messages": [{"role": "user", "content": "x"}]}], check=False)
    assert proc.returncode == 1
    assert "endfor" in proc.stderr.decode()


def test_bad_json_line_names_the_line():
    proc = run(["chat-template"], [{"messages": [{"role": "user", "content": "ok"}]}], check=False)
    assert proc.returncode == 0
    import subprocess
    from dsv3_cli import dsv3_bin
    p = subprocess.run([dsv3_bin(), "chat-template"], input=b'{"messages": []}\n{"messages": [}\n', capture_output=True)
    assert p.returncode == 1
    assert b"line 2" in p.stderr


def test_directory_with_only_tokenizer_config(tmp_path):
    config = json.load(open(os.path.join(BUNDLED, "tokenizer_config.json"), encoding="utf-8"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")
    msgs = [{"role": "user", "content": "Hi"}]
    got = run(["chat-template", "--tokenizer-dir", str(tmp_path)], [{"messages": msgs, "add_generation_prompt": True}])
    assert got == [{"text": "<｜begin▁of▁sentence｜><｜User｜>Hi<｜Assistant｜>"}]
