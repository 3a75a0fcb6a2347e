<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="robots" content="noindex, nofollow">
<meta name="referrer" content="no-referrer">
<meta name="color-scheme" content="light dark">
<title>{{title}} · PausePoint</title>
<link rel="stylesheet" href="/static/pausepoint.css">
% if get('script'):
<script src="/static/{{script}}" defer></script>
% end
</head>
<body>
<main{{!' class="wide"' if get('wide') else ''}}>
{{!base}}
</main>
<footer>PausePoint</footer>
</body>
</html>
