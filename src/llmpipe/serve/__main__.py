"""python -m llmpipe.serve: the OpenAI-compatible server (llmpipe.serve.app)."""

from llmpipe.serve.app import main

if __name__ == "__main__":
    main()
