"""`hydra/launcher=ray`: a sweep's jobs as Ray tasks, on this machine or a Ray cluster.

Ours rather than the released `hydra-ray-launcher` 1.2.2, which pins `cloudpickle<3` (a
downgrade of the 3.x that MLflow and joblib use here) and pulls in boto3 and `ray[default]`
for its AWS mode; this one needs only Ray itself: `pip install -e ".[ray]"`.
"""
