"""deploy/check: the deployment files (Kubernetes, compose, images) checked offline against each other and the code."""
