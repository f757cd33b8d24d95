from fullstack_ml.stage import run
from stages.profile import main

run(main)
