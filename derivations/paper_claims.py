def judge_all(ops, progress=print):
    return []
def render_json(v):
    import json; return json.dumps(v, indent=1) + "\n"
def render_md(v):
    return "# Paper claims\n"
