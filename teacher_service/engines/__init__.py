"""Teachers served by inference engines (vLLM's OpenAI-compatible server): a job's members may be engines,
which darkstore drives with token ids while keeping what it does itself (resume, checks, ensembles, the store).

- :mod:`.vllm`: the server's API: requests, retries, checks before a job, answers checked whole;
- :mod:`.capture`: what top-K log-probabilities become: the tail's mass, an ensemble over the returned tokens;
- :mod:`.run`: a job's chunks requested, combined and written, the first checked against a reference.
"""
