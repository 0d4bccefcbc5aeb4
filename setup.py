from setuptools import find_packages, setup

# kernels/ sits at the top of the source tree and installs as the subpackage fastgen.kernels,
# so its import name never clashes with another distribution's top-level "kernels".
packages = find_packages(include=["fastgen", "fastgen.*"])
package_dir = {"fastgen": "fastgen", "fastgen.kernels": "kernels"}
# bench/ (benchmarks and the report runner) installs the same way, as fastgen.bench, so
# ``python -m fastgen bench`` works from an installed package.
package_dir["fastgen.bench"] = "bench"
packages.append("fastgen.bench")

setup(
    name="fastgen",
    version="0.1.0",
    description="Fused Triton kernels for sampling VAEs, GANs and diffusion models, each validated against a torch reference",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=packages + ["fastgen.kernels"],
    package_dir=package_dir,
    package_data={"fastgen": ["checkpoints/*.pt"]},
    install_requires=[
        "torch>=2.4",
        "triton>=3.2; platform_system == 'Linux'",
        "numpy",
        "tqdm",
        "diffusers>=0.30",  # fastgen.schedulers subclass diffusers' scheduler classes
        "Pillow",  # PNG files (fastgen.images)
    ],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "scipy", "hypothesis", "diffusers", "scikit-learn", "matplotlib",
                 "torchsde"],  # torchsde: diffusers' DPMSolverSDEScheduler, one of the compatibles
        "train": ["scikit-learn", "matplotlib"],
        "bench": ["pytest-benchmark", "nvidia-ml-py", "matplotlib", "diffusers"],  # diffusers: the peer rows
    },
    entry_points={"console_scripts": ["fastgen=fastgen.cli:main"]},
)
