"""{{ cookiecutter.project_name | docstring_text }}.

{{ cookiecutter.description | docstring_text }}

``train.train_and_evaluate(config, workdir)`` trains and evaluates; ``main.py`` is its command line.
"""
