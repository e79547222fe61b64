"""The HumDial challenge layer (Track 1: emotional trajectory, emotional reasoning, empathy), above the engine:
the task table (tasks.py), the Task 1 metric (trajectory.py), the scorer the scripts hand to the runner
(scoring.py), the submission package and its validator (submission.py), and the LLM judge (judge.py).
The engine (models/, dataset_v1, runner, inference, metrics) never imports this package."""
