"""The fullstack-ml library: what more than one stage, the service, tests or bench use.

It never imports `stages/`; `runtime/` is the part the bento ships.
"""
