def example_docs(progress=print):
    return {}
