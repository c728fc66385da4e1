from setuptools import find_packages, setup

setup(
    name="hpcqml",
    version="0.1.0",
    description="Distributed HPC benchmarks for Hessian spectra of pruned networks and the classical side "
                "of quantum Carleman training (Liu et al.)",
    packages=find_packages(include=["hpcqml", "hpcqml.*"]),
    python_requires=">=3.10",
    # numpy, scipy, h5py, mpi4py, petsc4py, slepc4py and matplotlib come from Debian (env/install.sh)
    # or conda (env/environment.yml); they are deliberately not pip requirements.
    install_requires=["torch>=2.0", "tqdm"],
    extras_require={
        # ipython<8.24: Debian's matplotlib 3.6 imports IPython.core.pylabtools.backend2gui, removed in 8.24.
        # curvlinops (the library tests' reference operator) is installed by env/install.sh without its
        # torchvision dependency, which the registry offers only as a build that does not load beside CPU torch.
        "test": ["pytest", "pytest-timeout", "pytest-xdist", "nbclient", "nbformat", "ipykernel", "ipython<8.24", "pyyaml", "pyhessian==0.1",
                 "ruff==0.17.6", "mypy==2.4.1"],
        # hpcqml.results' to_dataframe()/to_xarray() for notebooks (pinned numpy 1.24 resolves both)
        "analysis": ["pandas>=2,<3", "xarray>=2023.1"],
    },
    entry_points={"console_scripts": ["hpcqml=hpcqml.cli:main"]},
)
