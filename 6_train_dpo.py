"""Stage 6: DPO training of the strong model on the pairs.

python 6_train_dpo.py --config configs/demo.yaml [--field value ...]
"""

from capdpo.stages.train_dpo import main

if __name__ == "__main__":
    main()
