"""{{ cookiecutter.project_name }}.

{{ cookiecutter.description }}

``train.train_and_evaluate(config, workdir)`` trains and evaluates; ``main.py`` is its command line.
"""
