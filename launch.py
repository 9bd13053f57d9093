"""Entry point. Until training lands: builds the default dataset and prints its summary.

    python launch.py [--dataset=synthetic_patients/default] [--data_dir=D]
"""

from absl import app

from mmjax.data import summary

if __name__ == "__main__":
    app.run(summary.main)
