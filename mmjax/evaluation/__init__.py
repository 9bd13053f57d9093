"""Evaluation of a trained model: a predictor (from a workdir or a live training state), the eval files,
robustness and Shapley values, explanations, figures, the HTML report, prediction for new patients and
the comparison of two runs. Imports the training runtime, never the train loop."""
