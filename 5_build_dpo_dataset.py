"""Stage 5: build preference pairs and export them.

python 5_build_dpo_dataset.py --config configs/demo.yaml [--field value ...]
"""

from capdpo.stages.build_dpo_dataset import main

if __name__ == "__main__":
    main()
