% rebase('base.tpl', title='Sign up')
<h1>Sign up</h1>
% if not registration_open:
<p class="outcome" id="closed">Registration is closed on this server. The operator adds developers with
<code>python pausepoint.py create-developer --email … --name …</code>, which prints their API keys.</p>
% else:
  % if error:
<p class="error" role="alert">{{error}}</p>
  % end
<form method="post" action="/dashboard/signup" class="stack">
  <input type="hidden" name="csrf" value="{{csrf}}">
  <label for="email">Email</label>
  <input id="email" name="email" type="email" autocomplete="email" required maxlength="254" value="{{values.get('email', '')}}">
  <label for="name">Your name or your team's (shown to the people you ask)</label>
  <input id="name" name="name" autocomplete="name" required maxlength="100" value="{{values.get('name', '')}}">
  <label for="password">Password (at least 8 characters)</label>
  <input id="password" name="password" type="password" autocomplete="new-password" required minlength="8">
  <button type="submit">Create my account and keys</button>
</form>
% end
<p>Already signed up? <a href="/dashboard/login">Log in</a>.</p>
